"""The web edge: the only package that imports Flask."""
