"""Local Kafka for development and tests: one JVM broker, a 3-node cluster, isolated configs."""
