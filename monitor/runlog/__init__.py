"""Run directory: writer, reader, TensorBoard event encoding."""
