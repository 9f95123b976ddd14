"""Meshes, logical-axis rules, placement of params and batches, several processes."""
