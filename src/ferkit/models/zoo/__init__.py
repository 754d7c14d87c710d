"""Architectures; importing this package registers every one of them."""

from ferkit.models.zoo import vgg  # noqa: F401
