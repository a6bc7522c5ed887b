//! Browser end-to-end test (stub).
