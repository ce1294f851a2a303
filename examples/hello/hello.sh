#!/bin/sh
echo "Hello from a build narfs brought back."
