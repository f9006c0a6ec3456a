"""Privacy primitives for the local trainer: secure Gaussian noise and the accountants.

Import-light on purpose: the submodules import torch / opacus, this package file does not.
"""
