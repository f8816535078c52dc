"""The federated engine: client and server functions, the byte ledger and the in-process simulator."""
