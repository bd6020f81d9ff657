"""The wire-free serving pipeline: validated request -> engine events -> stop matcher -> completion events."""
