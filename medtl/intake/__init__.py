"""From a source file (or an array item) to a checked, decoded image: readers, sources, the privacy policy."""
