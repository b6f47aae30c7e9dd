"""cnn.train."""
