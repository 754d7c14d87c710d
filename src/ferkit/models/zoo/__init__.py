"""Architectures; importing this package registers every one of them."""

from ferkit.models.zoo import bokanyi, frivas, resnet, sixclass, tan, vgg, xception  # noqa: F401
