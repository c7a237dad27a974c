"""The app's routers, one per area; each declares its authentication once."""
