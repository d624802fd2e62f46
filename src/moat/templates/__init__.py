"""Templates: a read-only root filesystem plus settings, built once and used by every tier."""
