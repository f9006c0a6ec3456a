"""A user-defined image model on Fashion-MNIST."""
