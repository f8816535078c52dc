"""quickstart: a Flower / PyTorch ClientApp."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from fedcodec.flower import codec_mod, compressed_training

from .task import Net, load_data
from .task import test as test_fn
from .task import train as train_fn

# Flower ClientApp
app = ClientApp(mods=[codec_mod])


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cpu")
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    trainloader, _ = load_data(partition_id, num_partitions, context.run_config["batch-size"],
                               context.run_config["data-dir"], context.run_config["examples-per-node"])
    torch.manual_seed(1000 * msg.content["config"]["server-round"] + partition_id)  # reproducible shuffling
    epochs = context.run_config["local-epochs"]

    with compressed_training(model, msg, context, steps=epochs * len(trainloader)):
        train_loss = train_fn(model, trainloader, epochs, msg.content["config"]["lr"], device)

    model_record = ArrayRecord(model.state_dict())
    metrics = {"train_loss": train_loss, "num-examples": len(trainloader.dataset)}
    content = RecordDict({"arrays": model_record, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the model on local data."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cpu")
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    _, valloader = load_data(partition_id, num_partitions, context.run_config["batch-size"],
                             context.run_config["data-dir"], context.run_config["examples-per-node"])

    eval_loss, eval_acc = test_fn(model, valloader, device)

    metrics = {"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": len(valloader.dataset)}
    content = RecordDict({"metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
