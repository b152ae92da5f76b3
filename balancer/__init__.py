"""Load balancing over registered instances (see DESIGN.md)."""
