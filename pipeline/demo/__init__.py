"""The built-in demo study: a generated dataset and small models trained by the demo itself."""
