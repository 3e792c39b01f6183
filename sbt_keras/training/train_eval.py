"""The generalization gap (Keskar et al. 2017, Table 2): the final network's accuracy on
the training set beside its test accuracy.

history.csv's train_accuracy is the running mean over an epoch's batches, in training
mode (batch statistics, augmented images, weights changing under it): not the network's
accuracy on the training set. After the last epoch this evaluates the final network the
way the test set is evaluated (inference mode, BN moving statistics, no augmentation, the
same `test_step`, loss and padding) on `--train_eval_examples` training examples (a fixed
sample, train_sample.SAMPLE_SEED; all of them when the set is smaller), and adds to
result.yaml:

    train_eval_examples   how many training examples were evaluated
    train_eval_accuracy   their accuracy
    train_eval_loss       their mean cross-entropy (no weight decay term)
    generalization_gap    train_eval_accuracy - final_test_accuracy (the last epoch's)

Nothing is trained or changed: it runs after `fit`, after the last checkpoint. Diverged
runs, and streamed ImageNet, get no such values.
"""
import time

from absl import logging

from sbt_keras.training import train_sample


def final_training_set_metrics(cfg, model, result):
    """The values above for `result` (summarize()'s dict), or {} when they do not apply."""
    from sbt_keras.data import pipeline

    if result.get("status") != "completed" or cfg.dataset == "imagenet2012":
        return {}
    started = time.monotonic()
    arrays, mean, std = train_sample.load(cfg, cfg.train_eval_examples)
    dataset = pipeline.eval_dataset(arrays, batch_size=cfg.eval_batch_size, mean=mean,
                                    std=std)
    # Global batches, as train.py counts the test set's (a per-worker dataset's per-replica
    # batches would otherwise be counted).
    steps = -(-len(arrays) // cfg.eval_batch_size)
    metrics = model.evaluate(dataset, steps=steps, verbose=0, return_dict=True)
    accuracy, loss = float(metrics["accuracy"]), float(metrics["loss"])
    logging.info("Final network on %d training examples (inference mode): accuracy %.4f, "
                 "loss %.4f (%.1f s)", len(arrays), accuracy, loss, time.monotonic() - started)
    return {"train_eval_examples": len(arrays), "train_eval_accuracy": accuracy,
            "train_eval_loss": loss,
            "generalization_gap": accuracy - float(result["final_test_accuracy"])}
