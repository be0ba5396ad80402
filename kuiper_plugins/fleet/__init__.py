"""Many nodes, one plugin set: the document that says which plugins a node should have, and its apply."""
