//! wsbus
