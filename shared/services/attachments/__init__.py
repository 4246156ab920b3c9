"""Attachments: the service, file deletions, the orphan scan and the storage layer."""
