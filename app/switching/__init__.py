"""Which store serves: the storage flag and its cluster copy, the routing and write gate,
the hand-over between stores, and the shadow that mirrors writes to the other store."""
