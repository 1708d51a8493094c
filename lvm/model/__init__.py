"""The P6 transformer, the P6b combined loss, the optimizer and the LightningModule that trains them."""
