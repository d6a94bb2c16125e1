"""Expert routing shared by training and serving: the gate as the model calls it (`gate`), load
balance statistics, the bias update and the balance loss (`balance`), and the state the
RouterActor holds (`state`). Import from the submodules."""
