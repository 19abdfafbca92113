"""sqz's rate-accuracy and speed suite (never run inside the tests' timing)."""
