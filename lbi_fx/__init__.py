"""lbi-fx."""
