"""Data shipped with jaxlstm (see README.md in this folder)."""
