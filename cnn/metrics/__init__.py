"""cnn.metrics."""
