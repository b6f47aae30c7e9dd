"""cnn.tasks."""
