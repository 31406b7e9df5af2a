"""`blink build` and `blink import`: thin commands over the publish step."""
