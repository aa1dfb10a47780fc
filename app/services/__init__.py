"""The services: the public interface of SPEC §3, the same on every store."""
