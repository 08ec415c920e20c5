"""What the API and the worker share: settings, the database schema and session."""
