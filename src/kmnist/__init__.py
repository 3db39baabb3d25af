"""kmnist: train, evaluate, compare and serve classifiers for Kuzushiji-MNIST and Kuzushiji-49."""

__version__ = "0.1.0"
