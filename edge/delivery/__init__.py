"""Model delivery on the device: download, verify and store artifacts named by signed manifests."""
