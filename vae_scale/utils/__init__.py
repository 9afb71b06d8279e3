"""Small helpers every room uses: seeds, files, the network, the progress display, and the
private APIs of our dependencies (compat)."""
