"""streamer: a Kafka-native worker fleet for LLM text generation."""

__version__ = "0.1.0"
