"""Generated from proto/ by `python -m facesvc.protogen`; do not edit."""
