"""Connection types: their properties (for the schema) and which fields are secrets."""
