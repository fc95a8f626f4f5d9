"""An ordinary KerasTuner RandomSearch script, run by `kerasmgpu launch --tuner` in the tests.

Usage: python tune_script.py DIRECTORY EVENTS MODE, MODE one of
- "search": 6 trials;
- "kill": the same, but tuner0 kills itself (SIGKILL) in the middle of its second trial,
  once (a marker file in DIRECTORY remembers it);
- "fail": every trial's model fails to build (the first builds, which every process makes
  to learn the search space before searching, succeed: the chief keeps serving and the
  tuner workers fail, each after KerasTuner's consecutive failed trials).
Each trial's start and end are appended to EVENTS as JSON lines.
"""

import json
import os
import signal
import sys
import time

import keras
import keras_tuner
import numpy as np

directory, events_path, mode = sys.argv[1:4]
tuner_id = os.environ.get("KERASTUNER_TUNER_ID", "alone")


def log(event, **fields):
    with open(events_path, "a") as events:
        events.write(json.dumps({"event": event, "tuner": tuner_id, "pid": os.getpid(),
                                 "time": time.time(), **fields}) + "\n")


class Trace(keras.callbacks.Callback):
    trials_begun = 0

    def on_train_begin(self, logs=None):
        Trace.trials_begun += 1
        log("begin")

    def on_epoch_end(self, epoch, logs=None):
        marker = os.path.join(directory, "killed-once")
        if (mode == "kill" and tuner_id == "tuner0" and Trace.trials_begun == 2
                and not os.path.exists(marker)):
            open(marker, "w").close()
            log("killed")
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, logs=None):
        log("end")


searching = False


def build(hp):
    if mode == "fail" and searching:
        raise ValueError("this model refuses to build")
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(hp.Int("units", 4, 64, step=4), activation="relu"),
        keras.layers.Dense(3, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


rng = np.random.default_rng(0)
x = rng.normal(size=(400, 8)).astype("float32")
y = np.argmax(x[:, :3], axis=1)
tuner = keras_tuner.RandomSearch(build, objective="val_accuracy", max_trials=6, seed=0,
                                 directory=directory, project_name="search")
searching = True
tuner.search(x, y, epochs=3, batch_size=32, validation_split=0.25, callbacks=[Trace()],
             verbose=0)
if tuner_id == "chief":
    completed = [trial for trial in tuner.oracle.trials.values() if trial.status == "COMPLETED"]
    print(f"chief: {len(completed)} trials completed, best val_accuracy "
          f"{tuner.oracle.get_best_trials(1)[0].score:.3f}", flush=True)
