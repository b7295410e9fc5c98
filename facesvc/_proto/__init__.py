"""Generated from proto/ by `python -m tools.protogen`; do not edit."""
