"""Code both parts of a split model need: the wire contract, the tensor codec, data and model pairs."""
