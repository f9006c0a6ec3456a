"""A vibration-sensor task: a 1-D convolutional model on windows of a synthetic signal."""
