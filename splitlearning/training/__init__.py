"""Training classes that more than one role uses, pure TensorFlow/Keras with no gRPC: `LossTrainer` trains a
part that ends in the loss (the server's part of a standard cut, the U-shaped client's head), `FuseTrainer` the
label party's top over several feature parties' IVs (vertical split learning, docs/vertical.md); `deferred`
and `keras_setup` are what they share."""
