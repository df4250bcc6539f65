"""`streamer tune`: search engine knobs, A/B-test each change, adopt only measured gains."""
