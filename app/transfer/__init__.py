"""Moving state as a stream (SPEC §7): the export and import format, and the spool an
import's rows wait in until the whole stream is valid."""
