"""Consumer groups: topics, groups, members, assignment and rebalancing (see DESIGN.md)."""
