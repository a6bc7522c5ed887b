// wsbus client module (placeholder, replaced by the real client).
export {};
