"""pgvector tables, embeddings and chunking, shared by vector_search and vector_upsert."""
