"""The goodput stack: the ledger (where every second of an attempt went), the run history read back from a
work dir, the report and its pictures, and the loss/mAP curve plot. Nothing in the engine imports it."""
