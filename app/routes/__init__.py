"""HTTP routes: thin handlers that parse, call the runtime or registry, and shape answers."""
