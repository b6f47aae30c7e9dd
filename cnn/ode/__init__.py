"""cnn.ode."""
