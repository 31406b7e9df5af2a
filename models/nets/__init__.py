"""The networks: the from-scratch CNN and ImageNet-pretrained backbones."""
